"""Scores and post-processing: pixel metrics (the one Dice, confusion-matrix metrics), buildings matched
one to one, and the threshold / component filter with its out-of-fold search.
"""
