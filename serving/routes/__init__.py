"""One APIRouter per concern; ``app.py`` mounts them."""
