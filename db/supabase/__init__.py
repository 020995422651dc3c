"""Supabase mode: migrations (`migrations/`), edge functions (`functions/`), local tooling (`local.py`)."""
