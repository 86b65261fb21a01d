"""The main job, end to end: explain a real sentiment classifier's predictions on held-out reviews
with raw, effective and efficient attention next to IntegratedGradients and Saliency.

Run it with ``make demo`` or ``python -m captum_effattn.demo``.
"""
