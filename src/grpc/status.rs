//! The one place where errors become gRPC statuses.
