"""evaluation: faithful metrics (perplexity, Dist-n, BERTScore, emotion and sentiment alignment),
distributed generation sweeps on Ray, results in the store, tables and plots.

Doors: `metrics.*`, `evaluate(run, ...)`, `sweep(config)`, `report(...)`.
"""
