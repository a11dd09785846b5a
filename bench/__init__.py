"""sasa-bench: cases -> measure -> results -> reports, for the implementations in sasa_impls."""
