from session_service.server import main

main()
