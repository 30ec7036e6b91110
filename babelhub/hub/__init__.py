"""babelhub.hub"""
