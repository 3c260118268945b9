"""The API's routers, one per audience: clients (bearer token) and admins (X-API-Key)."""
