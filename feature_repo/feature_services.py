from feast import FeatureService, FeatureView

from features.catalog import FEATURE_SERVICES


def feature_services(views: dict[str, FeatureView]) -> list[FeatureService]:
    """One feature service per model (`churn`, `next_best_offer`, `send_time`)."""
    return [
        FeatureService(
            name=service,
            features=[views[name] for name in view_names],
            description=f"Features the {service} model trains and scores on.",
        )
        for service, view_names in FEATURE_SERVICES.items()
    ]
