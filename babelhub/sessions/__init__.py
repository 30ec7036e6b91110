"""babelhub.sessions"""
