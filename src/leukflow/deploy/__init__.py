"""Deploy: predict on new images and the local review page."""
