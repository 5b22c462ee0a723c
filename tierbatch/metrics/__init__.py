"""Prometheus metrics: every series defined once (`catalog`), counted after commit (`commit`, `record`),
read at scrape time (`live`), and exposed per process or summed over processes (`exposition`, `process`)."""
