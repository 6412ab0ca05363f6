"""`merg explore`: the local web app over the store (see `app.py`)."""
