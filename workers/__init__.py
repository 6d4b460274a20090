"""What runs beside a resident model: adapters, the one patching mechanism, the trace engines."""
