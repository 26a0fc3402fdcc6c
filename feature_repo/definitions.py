"""Everything `engage features apply` registers, built for one ENGAGE_HOME."""

from pathlib import Path

from feature_repo.data_sources import customer_snapshot_source
from feature_repo.entities import customer
from feature_repo.feature_services import feature_services
from feature_repo.feature_views import feature_view
from features.catalog import all_views


def definitions(home: Path, profile_columns: dict[str, str], ttl_days: int) -> list:
    """The entity, source, feature views and feature services, in the order Feast applies them.

    ``profile_columns`` are the extra customer columns of this warehouse: they join the profile view.
    """
    source = customer_snapshot_source(home)
    views = {name: feature_view(name, feats, source, ttl_days) for name, feats in all_views(profile_columns).items()}
    return [customer, source, *views.values(), *feature_services(views)]
