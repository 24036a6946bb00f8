"""The management plane: the REST API, the dashboard and the exporters of a running job."""
