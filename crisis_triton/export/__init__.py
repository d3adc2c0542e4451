"""The export command: weights -> verified graphs -> a published repository."""
