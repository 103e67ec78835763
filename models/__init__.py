"""apt_hal.models: transformer models written only against the HAL (torch, apt_hal, stdlib)."""
