//! The operator: reconciles `ImageIndex` resources into a Milvus collection, the MySQL catalog,
//! embedding Jobs (`imageindex embed`) and the search Deployment + Service (`imageindex serve`).
//! Not built yet: the data plane it schedules (`embed`, `serve`) comes first.
