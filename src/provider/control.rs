//! Core's control API as vmhost uses it: access tokens from the refresh token, and job updates.
