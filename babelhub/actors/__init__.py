"""babelhub.actors"""
