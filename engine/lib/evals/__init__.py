"""The eval suites: item files and schemas, how each suite runs, metrics, statistics, report blocks."""
