"""Models: backbone adapter over timm, heads, the fusion op, searchable networks and ArchSpec."""
