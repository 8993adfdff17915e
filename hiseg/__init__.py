"""Code shared by the CAST and OAP projects: compatibility, data, engine, evaluation."""
