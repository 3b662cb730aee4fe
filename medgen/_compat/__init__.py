"""The only place that reaches into Flower's or Opacus' modules beyond their top-level API: one
module per library, each checking the version it was written against."""
