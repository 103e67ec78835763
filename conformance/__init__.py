"""apt_hal.conformance: every available backend checked against the CPU reference."""
