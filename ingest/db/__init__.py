"""The database side: binary COPY and upserts (`sink`), the sensor registry (`registry`),
schema migrations (`migrate`) and retention (`retention`)."""
