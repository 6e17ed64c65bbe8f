"""Where the models looked: Grad-CAM heatmaps for the report's gallery, and a check on them.

    python -m cxr_fast.explain --pred-dir all_pred [--recipe R ...] [--shards DIR]

Modules: cam (the layer to explain and token maps, for every study arch family), run (which
images, the files), pointing (do heatmaps point at the phantom's drawn findings?).
"""
