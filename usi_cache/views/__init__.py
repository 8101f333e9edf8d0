"""Views: what both stages replay. Sampling a view's crop, flip and RandAugment ops (sampling.py,
randaugment.py), mixing two views (mixing.py), and rendering a view's pixels (render.py).
"""
