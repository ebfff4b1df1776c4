"""The plant simulator (`simulate`) and its MQTT publisher (`publisher`)."""
