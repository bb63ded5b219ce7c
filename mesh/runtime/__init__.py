"""The delivery machinery: the ladder every delivery goes down, retries, dead letters, discovery,
timers and the client that sends.
"""
