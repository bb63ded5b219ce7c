"""Values as they travel: message types, subjects, the envelope's headers and limits, codecs, errors,
settings.
"""
