"""Privacy mechanisms that need no transport: secure aggregation (:mod:`enclavefl.privacy.secagg`)."""
