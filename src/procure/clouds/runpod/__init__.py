"""RunPod (REST v2, pods): the client procure rents GPUs with (`client.RunPodCloud`) and a mock
of RunPod's API for tests and demos (`mock.start_mock_cloud`)."""
