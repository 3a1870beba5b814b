"""The build dashboard (Textual), installed as `behaviorc.tui`: `Dashboard` in app.py."""
