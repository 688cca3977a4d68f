from services.keyframe_renderer.server import main

main()
