"""The bottom layer: errors, atomic files and locks, the cache folder, and the names of every MLflow record.

Nothing here imports anything else of the package.
"""
