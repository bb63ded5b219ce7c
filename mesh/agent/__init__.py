"""An agent process: its declaration, the context its handlers get, the runner that feeds them, start-
up and serving.
"""
