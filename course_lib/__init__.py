"""course_lib: the reference code that the Mask R-CNN from Scratch notebooks build and explain.

One idea per module, in reading order: data, viz, boxes, anchors, roi_ops, backbone, rpn,
roi_heads, mask_head, fpn, model, train, evaluate, experiments, transfiner; beside them, claims
(the chapters' checked claims). Notebooks import modules, not names:
``from course_lib import boxes`` then ``boxes.box_iou(...)``.
"""
__version__ = "0.1.0"
