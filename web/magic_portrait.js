// Magic Portrait's frontend extension: keeps the crops of ID Embeds nodes saved with Magic Portrait 0.2 (see
// face_margin.js). New nodes are marked with the per-side convention, so they are saved with it.
import { app } from "../../scripts/app.js";
import { CONVENTION_PROPERTY, NODE_TYPE, PER_SIDE, WIDGET, marginFromSaved } from "./face_margin.js";

app.registerExtension({
  name: "MagicPortrait.FaceMarginPerSide",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) {
      return;
    }
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      this.properties = this.properties ?? {};
      this.properties[CONVENTION_PROPERTY] = PER_SIDE;
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      const result = onConfigure?.apply(this, arguments);
      const widget = this.widgets?.find((w) => w.name === WIDGET);
      if (widget) {
        widget.value = marginFromSaved(widget.value, info?.properties);
      }
      this.properties = this.properties ?? {};
      this.properties[CONVENTION_PROPERTY] = PER_SIDE;
      return result;
    };
  },
});
