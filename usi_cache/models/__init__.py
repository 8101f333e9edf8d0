"""Models: building a timm model for either stage (build.py), loading checkpoints safely
(checkpoints.py), precision (precision.py), and the stage-1 teacher (teacher.py).
"""
