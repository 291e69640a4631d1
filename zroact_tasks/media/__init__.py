"""Video decoding, keyframe/clip arithmetic and the frame store shared by every worker."""
