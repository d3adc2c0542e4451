"""Preprocessing of a crisis post, torch-free: it runs in the served repository too."""
