"""Python-backend model files, copied into every model repository by repository/writer.py."""
