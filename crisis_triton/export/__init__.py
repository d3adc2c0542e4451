"""The export: weights -> verified graphs -> a published repository.

request.py (ExportRequest), pipeline.py (export_repository), report.py (ExportReport), cli.py
(export.py's parser and main).
"""
