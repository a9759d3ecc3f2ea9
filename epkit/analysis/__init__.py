"""Analyse a sweep: ``results`` (one tidy row per run), ``plots``, ``report`` (one offline HTML
page), ``widgets`` (the notebook planner) and ``gate`` (a regression gate against a baseline).

    from epkit.analysis import plots, results
    runs = results.load("results/sample/quickstart")
    plots.pareto(runs)

The modules are imported on use: ``results`` needs pandas, ``plots`` plotly.
"""
