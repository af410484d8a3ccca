"""Reading finished runs: numbers about data, folds and predictions (analysis), figures, and
`make report`.
"""
