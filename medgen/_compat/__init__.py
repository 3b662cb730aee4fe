"""The only place that reaches into Flower's or Ray's modules beyond their top-level API: one
module per library, each saying the version it was written against."""
