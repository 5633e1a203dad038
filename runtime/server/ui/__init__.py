"""The dashboard's static files, served at ``/ui`` by ``routes/ui.py``: plain HTML, CSS and
JavaScript modules, written by hand, with no build step and no Node at run time.

``index.html`` is the one page; ``app.js`` routes among the views (``#/models``,
``#/runs``, ``#/runs/ID``, ``#/peers``, ``#/usage``, ``#/cache``); ``api.js`` is its one
client of the daemon's JSON routes and their event streams; ``dom.js`` builds elements
from text (never from HTML); ``graph.js`` draws a DAG run, ``charts.js`` the usage chart
and the peers' topology, all as SVG. ``login.html`` asks for the API key when one is
set."""
