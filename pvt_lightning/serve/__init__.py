"""Serving a trained classifier over HTTP with LitServe (the optional ``[serve]`` extra).

``preprocess``: upload bytes -> the uint8 crop predict feeds the model; ``upload``: reading a request body
(raw or multipart) into that crop, with 4xx answers; ``model``: the model file and its preprocessing;
``api``: the LitAPI (batching, probabilities, decisions); ``app``: the LitServer built from settings.
"""
