"""Evaluation: downstream classifiers, fidelity metrics, memorization, grids.

Works on image arrays only; never imports a method.
"""
