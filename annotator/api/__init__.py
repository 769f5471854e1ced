"""The REST API under /api/v1/ (Django REST Framework, OpenAPI 3 schema by drf-spectacular at
/api/schema/, browsable docs at /api/docs/). Per-user tokens (``Authorization: Token …``,
made in the admin or on the user's page) or the browser session; every project-scoped call is
limited to the projects the user is a member of, with the same roles as the UI (another
project's ids answer 404). Writes go through the same services as the UI, so audit fields,
refits and Label Studio behave exactly as for an answer given on the label page."""
